//! Benchmark harnesses for exo-router; each binary in `src/bin` prints a table of measured numbers.
