"""The training entry: ``python -m ep_train.train --recipe R.yaml`` (see ``__main__``)."""
