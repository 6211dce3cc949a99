"""Evaluation: datasets (`datasets`), metrics (`metrics`) and the one unit scorer (`scoring`) that sweeps use."""
