"""The ablations of ``kvserve bench ablation``, one module each (run by
:mod:`kvserve.bench.ablation`)."""
