"""The kernel side, seen from Python: compile/load (loader), map views (maps), the one map writer
(reconciler) and program attachment (attach)."""
