"""One process of a distributed LassoTuner search (chief or worker, chosen by the
KERASTUNER_* environment variables). Run by test_tuner_distributed.py."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from tuner_problems import regression_problem

import keras_implicit as ki
import keras_implicit.tuner


def main(directory, max_trials):
    x, y, x_val, y_val = regression_problem()
    tuner = ki.tuner.LassoTuner(
        ki.lasso.Lasso(tol=1e-6),
        max_trials=max_trials,
        directory=directory,
        project_name="distributed",
    )
    tuner.search(x, y, validation_data=(x_val, y_val), verbose=0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
