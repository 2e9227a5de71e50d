"""densenet_exp: a research harness for DenseNet ablation studies (Huang et al., "Densely Connected
Convolutional Networks", CVPR 2017, arXiv:1608.06993). Entry points: `python -m densenet_exp.run`
(train, sweep), `python -m densenet_exp.report` (judge the paper's claims on the runs)."""

__version__ = "0.1.0"
