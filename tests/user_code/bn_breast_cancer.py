"""A user experiment for the tests: raw (unscaled) breast-cancer features, standardized by BatchNormalization."""

import keras
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from aggregathor.experiments.keras_experiment import KerasExperiment

x, y = load_breast_cancer(return_X_y=True)
x_tr, x_te, y_tr, y_te = train_test_split(x.astype("float32"), y, test_size=0.3, random_state=0, stratify=y)


def build() -> keras.Model:
    return keras.Sequential([keras.Input((30,)), keras.layers.BatchNormalization(momentum=0.9),
                             keras.layers.Dense(32, activation="relu"), keras.layers.Dropout(0.1),
                             keras.layers.Dense(2)])


experiment = KerasExperiment(build, train=(x_tr, y_tr), test=(x_te, y_te), name="bn-breast-cancer")
