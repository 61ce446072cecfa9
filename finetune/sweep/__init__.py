"""The sweep stage: the sweep file's schema, the Optuna study (one run directory per trial) and its report."""
