"""Runtime: errors, atomic io, distributed runs, devices and exit codes."""
