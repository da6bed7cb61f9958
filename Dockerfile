# SurveyTool, the throttle_mw demo app: one image for the app replicas and the load generator.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The library and its demo extra first, so editing the demo does not reinstall dependencies.
COPY pyproject.toml README.md ./
COPY throttle_mw ./throttle_mw
RUN pip install ".[demo]"

COPY demo_app ./demo_app

RUN useradd --create-home --uid 10001 surveytool \
    && mkdir -p /data /reports \
    && chown surveytool:surveytool /data /reports
USER surveytool

ENV SURVEYTOOL_DB=/data/surveytool.sqlite3
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=15s --retries=5 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

# --timeout-graceful-shutdown: in-flight requests finish, queued ones get a 503 (not a reset).
CMD ["uvicorn", "demo_app.app:app", "--host", "0.0.0.0", "--port", "8000", \
     "--no-access-log", "--timeout-graceful-shutdown", "15"]
