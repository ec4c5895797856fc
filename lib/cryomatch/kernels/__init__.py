"""Pure array-to-array functions (numpy or cupy through ``xp``): no file I/O, no printing."""
