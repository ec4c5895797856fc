"""File I/O: MRC, STAR, cryoSPARC .cs, the particle table; every write is atomic."""
