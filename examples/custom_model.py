"""Your own Keras model and data, trained Byzantine-resiliently: a BatchNormalization MLP on raw features.

scikit-learn's bundled breast-cancer set (569 tumours, 30 features, no download) is given unscaled (areas in
the thousands next to ratios below 0.1), so the first BatchNormalization layer standardizes it. From the
command line, 5 workers (4 honest, 1 Byzantine sending its gradient reversed) aggregated with Multi-Krum,
one process per rank:

    aggregathor train --experiment examples/custom_model.py:experiment --workers 5 --f 1 --byzantine 1 \\
        --attack reverse --gar multi-krum

or the same run with every rank in this process: ``python examples/custom_model.py``. Multi-Krum needs
``workers >= 2 f + 3``. Under ``mpiexec`` (``mpiexec -n 6 aggregathor train --launcher mpi ...``) or on several
machines, see docs/cluster.md; the Python API and ``module:attr`` references are in docs/api.md.
"""

import keras
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

import aggregathor

x, y = load_breast_cancer(return_X_y=True)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)


def build_model() -> keras.Model:
    return keras.Sequential([
        keras.Input((30,)),
        keras.layers.BatchNormalization(momentum=0.9),  # standardizes the raw features
        keras.layers.Dense(32, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(2),  # one logit per class
    ])


experiment = aggregathor.KerasExperiment(build_model, (x_train, y_train), (x_test, y_test), name="cancer-bn")

if __name__ == "__main__":  # the other ranks import this file: keep the run itself under this guard
    summary = aggregathor.train(experiment, launcher="simulate", workers=5, f=1, byzantine=1, attack="reverse",
                                gar="multi-krum")
    print(f"accuracy {summary.accuracy:.3f}")
