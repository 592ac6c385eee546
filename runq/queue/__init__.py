"""Everything that touches Redis: keys, Lua scripts, admission, task state, result waiting."""
