"""Fleet rollouts: one bundle's change across many databases, in waves (docs/rollouts.md)."""
