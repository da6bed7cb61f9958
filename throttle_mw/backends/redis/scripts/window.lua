-- window.lua: twin of throttle_mw/scheduler/window.py (FairRateWindow), function for
-- function. The window's fields live in the budget state S: win_at (start), win_v0 (v0),
-- win_cost (cost), v_rate, thr (throughput), meas_at (measured_at).

-- FairRateWindow.roll: close the open window if it is complete (callers check
-- now - S.win_at >= WINDOW). A window spanning an idle gap is dropped, not measured.
local function window_roll(vtime)
  local window = now - S.win_at
  if window <= STALE_WINDOWS * WINDOW then
    S.v_rate = (vtime - S.win_v0) / window
    S.thr = S.win_cost / window
    S.meas_at = now
  end
  S.win_at = now; S.win_v0 = vtime; S.win_cost = 0
end

-- FairRateWindow.fresh: is the last measurement recent enough to go by?
local function window_fresh()
  return now - S.meas_at <= STALE_WINDOWS * WINDOW
end
