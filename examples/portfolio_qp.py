"""Decision-focused learning: a portfolio QP layer trained end to end with model.fit.

Each day we see features x (market signals) and choose long-only portfolio weights w
for the next day's asset returns r (in percent). A network predicts the expected
returns mu_hat(x); the allocation is the mean-variance portfolio

    w*(mu_hat) = argmin_w  gamma/2 w^T Sigma w - mu_hat^T w   s.t.  1^T w = 1,  w >= 0

(`ki.layers.QuadraticProgram` with Q = gamma Sigma, A = 1^T, b = 1, G = -I, h = 0 fixed
and q = -mu_hat the layer input). Two ways to train the same network:

* two-stage: fit mu_hat to r by mean squared error, then plug it into the QP;
* decision-focused: train through the QP on what the investor gets, the realized
  utility  r^T w - gamma/2 w^T Sigma w  (the gradient flows through the argmin by
  implicit differentiation of its KKT conditions).

If the network could represent the true expected returns, both would get there (and
the MSE, a less noisy signal than realized utility, would get there faster). Decision-
focused learning pays off under model misspecification, and this market is built to
show it. Of its 12 assets, 4 "contenders" have expected returns between -0.2% and
0.8% a day, driven by the signals; the other 8 "laggards" have expected returns that
swing far more with the signals (between -5% and -1% a day) but never come near the
contenders', so the optimal portfolio never holds them. The network has 4 hidden
units: enough for the contenders, not for all 12 assets. The MSE weighs every asset
alike, and the laggards' large swings dominate it, so two-stage training spends the
hidden units on predicting returns that never change the decision. Decision-focused
training gets no gradient from an asset the portfolio does not hold (it sits on its
w >= 0 bound), so once the laggards are priced out it spends the units on the
contenders, and ends up much closer to the oracle that knows the true expected
returns. The same mechanism acts on whatever error a finite budget leaves: with
`--hidden 64` the two-stage fit, still dominated by the laggards after 30 epochs on
2000 noisy days, also falls short (seed 0: 14.4 against 18.8 bp/day); only with
enough capacity, data and epochs for an exact fit would the two meet.

Fairness: both methods train the same network from the same initial weights with the
same optimizer, learning rate, batch size and number of epochs, and are scored on the
same held-out days (the last epoch's weights, no model selection on those days). The
held-out curves in the figure show that the two-stage MSE fit with 4 hidden units has
converged: 200 epochs instead of 30 gain it under 0.5 bp/day.

    python examples/portfolio_qp.py [--quick] [--seed N] [--hidden H] [--out DIR]

Full mode: 2000 training / 5000 held-out days, 30 epochs (1200 training steps through
the QP layer), about 2 minutes on an idle 2-core CPU (4 on a heavily loaded one);
--quick is a smoke test (too short to train, its numbers mean nothing), well under a
minute. Prints a table of held-out utilities and saves output/portfolio_qp.png.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import matplotlib

matplotlib.use("Agg")
import keras
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

import keras_implicit as ki
import keras_implicit.layers  # the subpackage is not imported by the package yet

GAMMA = 1.0  # risk aversion, per percent of return
N_CONTENDERS, N_LAGGARDS, N_FEATURES = 4, 8, 5
N_ASSETS = N_CONTENDERS + N_LAGGARDS
LEARNING_RATE, BATCH_SIZE = 1e-2, 50  # the same for both training methods


def make_market(n_days, rng):
    """Features x, true expected returns mu(x), realized returns r and their covariance."""
    B_contenders = rng.normal(size=(N_FEATURES, N_CONTENDERS))
    B_laggards = rng.normal(size=(N_FEATURES, N_LAGGARDS))
    factors = rng.normal(size=(N_ASSETS, 2))
    Sigma = 0.25 * factors @ factors.T + np.eye(N_ASSETS)  # daily volatility ~1-1.5%
    x = rng.normal(size=(n_days, N_FEATURES))
    mu = np.concatenate(
        [0.3 + 0.5 * np.tanh(x @ B_contenders), -3.0 + 2.0 * np.sin(x @ B_laggards)], axis=1
    )
    r = mu + rng.multivariate_normal(np.zeros(N_ASSETS), Sigma, size=n_days)
    return tuple(a.astype("float32") for a in (x, mu, r, Sigma))


def portfolio_layer(Sigma, return_status=False):
    n = Sigma.shape[0]
    return ki.layers.QuadraticProgram(
        Q=GAMMA * Sigma,
        A=np.ones((1, n)),
        b=np.ones(1),
        G=-np.eye(n),
        h=np.zeros(n),
        input_names=("q",),
        # polishing lands on the exact active set anyway; a loose ADMM tolerance only
        # gets there in fewer iterations (it halves the training time)
        tol=1e-3,
        return_status=return_status,
        # during training an unsolved row just gets zero gradient; `decide` below
        # counts them on the evaluation days
        on_failure="ignore",
        name="portfolio",
    )


def predictor(hidden, seed):
    keras.utils.set_random_seed(seed)  # both methods start from the same weights
    return keras.Sequential(
        [
            keras.Input((N_FEATURES,)),
            keras.layers.Dense(hidden, activation="tanh"),
            keras.layers.Dense(N_ASSETS),
        ],
        name="mu_hat",
    )


def decision_model(mu_net, Sigma):
    x = keras.Input(mu_net.input_shape[1:])
    w = portfolio_layer(Sigma)(keras.layers.Lambda(lambda m: -m)(mu_net(x)))
    return keras.Model(x, w)


def negative_utility(Sigma):
    S = tf.constant(Sigma)

    def loss(r, w):
        risk = tf.reduce_sum(w * tf.linalg.matvec(S, w), axis=-1)
        return -tf.reduce_sum(r * w, axis=-1) + 0.5 * GAMMA * risk

    return loss


def utility(w, r, Sigma):
    """Mean daily utility of portfolios w under returns r (realized, or expected: r = mu)."""
    return float(np.mean(np.sum(r * w, -1) - 0.5 * GAMMA * np.einsum("bi,ij,bj->b", w, Sigma, w)))


class Decider:
    """The portfolios for given mu_hat, outside training; counts rows the QP left unsolved."""

    def __init__(self, Sigma):
        layer = portfolio_layer(Sigma, return_status=True)
        # one traced graph: eagerly, the solver's while loop would run op by op
        self._solve = tf.function(lambda mu_hat: layer(-mu_hat), reduce_retracing=True)
        self.unsolved = 0

    def __call__(self, mu_hat):
        w, status = self._solve(tf.constant(mu_hat, "float32"))
        self.unsolved += int(np.sum(status.numpy() != 0))
        return w.numpy()


class HeldOutUtility(keras.callbacks.Callback):
    """Records the realized held-out utility of mu_net's portfolios after every epoch."""

    def __init__(self, mu_net, decide, x, r, Sigma):
        super().__init__()
        self.mu_net, self.decide, self.x, self.r, self.Sigma = mu_net, decide, x, r, Sigma
        self.values = []

    def on_epoch_end(self, epoch, logs=None):
        mu_hat = self.mu_net.predict(self.x, batch_size=4096, verbose=0)
        self.values.append(utility(self.decide(mu_hat), self.r, self.Sigma))


def train(method, mu_net, x, r, Sigma, epochs, callback):
    """Fits mu_net by "mse" (two-stage) or through the QP ("decision"), same settings."""
    optimizer = keras.optimizers.Adam(LEARNING_RATE)
    if method == "mse":
        model = mu_net
        model.compile(optimizer=optimizer, loss="mse")
    else:
        model = decision_model(mu_net, Sigma)
        # XLA works too (jit_compile=True), but its compile of the solver loop (~30 s)
        # costs more than it saves in a run this short
        model.compile(optimizer=optimizer, loss=negative_utility(Sigma), jit_compile=False)
    model.fit(x, r, epochs=epochs, batch_size=BATCH_SIZE, callbacks=[callback], verbose=0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, small data")
    parser.add_argument("--seed", type=int, default=0, help="market and initialization seed")
    parser.add_argument("--hidden", type=int, default=4, help="hidden units of the predictor")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("output")))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(args.seed)
    n_train, n_test = (256, 1000) if args.quick else (2000, 5000)
    epochs = 3 if args.quick else 30
    x, mu, r, Sigma = make_market(n_train + n_test, rng)
    x_tr, r_tr = x[:n_train], r[:n_train]
    x_te, mu_te, r_te = x[n_train:], mu[n_train:], r[n_train:]
    decide = Decider(Sigma)

    start = time.perf_counter()
    nets, curves = {}, {}
    for name, method in (("two-stage (MSE)", "mse"), ("decision-focused", "decision")):
        nets[name] = predictor(args.hidden, seed=args.seed + 1)
        curves[name] = HeldOutUtility(nets[name], decide, x_te, r_te, Sigma)
        train(method, nets[name], x_tr, r_tr, Sigma, epochs, curves[name])
    elapsed = time.perf_counter() - start

    portfolios = {
        name: decide(net.predict(x_te, batch_size=4096, verbose=0)) for name, net in nets.items()
    }
    portfolios["oracle (true mu)"] = decide(mu_te)
    # what the signals are worth: the best fixed portfolio for the training-period mean
    portfolios["no signal (mean)"] = decide(np.tile(r_tr.mean(0), (n_test, 1)))
    portfolios["equal weights"] = np.full_like(r_te, 1.0 / N_ASSETS)
    realized = {k: utility(w, r_te, Sigma) for k, w in portfolios.items()}
    expected = {k: utility(w, mu_te, Sigma) for k, w in portfolios.items()}

    print(
        f"\n{n_train} training days, {epochs} epochs (training took {elapsed:.0f} s); "
        f"{n_test} held-out days; predictor with {args.hidden} hidden units; seed {args.seed}"
    )
    print("| policy             | realized utility (bp/day) | expected utility (bp/day) |")
    print("|--------------------|--------------------------:|--------------------------:|")
    for name in portfolios:
        print(f"| {name:18s} | {realized[name] * 100:25.2f} | {expected[name] * 100:25.2f} |")
    if decide.unsolved:
        print(f"note: {decide.unsolved} evaluation QPs were not solved (last iterate used)")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    colors = {
        "two-stage (MSE)": "C0",
        "decision-focused": "C1",
        "oracle (true mu)": "C2",
        "no signal (mean)": "C7",
    }
    for name, cb in curves.items():
        ax1.plot(np.arange(1, epochs + 1), np.array(cb.values) * 100, "o-", ms=3, label=name)
    for name in ("oracle (true mu)", "no signal (mean)"):
        ax1.axhline(realized[name] * 100, color=colors[name], ls="--", label=name)
    ax1.set(xlabel="epoch", ylabel="held-out utility (bp / day)", title="training")
    ax1.legend(fontsize=8)
    # equal weights hold the laggards and would dwarf the chart: it stays in the table
    ax2.bar(list(colors), [realized[k] * 100 for k in colors], color=list(colors.values()))
    for i, k in enumerate(colors):
        ax2.annotate(f"{realized[k] * 100:.1f}", (i, realized[k] * 100), ha="center", va="bottom")
    ax2.set(
        ylabel="realized held-out utility (bp / day)",
        title=f"held-out days (equal weights: {realized['equal weights'] * 100:.0f})",
    )
    ax2.tick_params(axis="x", rotation=15)
    fig.suptitle(f"portfolio QP layer: predictor with {args.hidden} hidden units")
    fig.tight_layout()
    path = out / "portfolio_qp.png"
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
