"""Plain functions, one module per outside system; each raises typed errors from `tasks.errors`."""
