-- window.lua: twin of throttle_mw/scheduler/window.py (FairRateWindow), function for
-- function. The window's fields live in the budget state S: win_at (start), win_v0 (v0),
-- win_cost (cost), v_rate, thr (throughput), meas_at (measured_at).

-- FairRateWindow.roll: close the open window and start the next one now: refill once it
-- is complete (now - S.win_at >= WINDOW), `busy` whether requests wait now; push when a
-- queue forms, not busy. Measured only if requests waited throughout it (a window starts
-- anew when a queue forms), and not if it spans an idle gap.
local function window_roll(vtime, busy)
  local window = now - S.win_at
  if busy and window <= STALE_WINDOWS * WINDOW then
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
