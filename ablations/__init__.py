"""Small-scale reproductions of the Skywork-MoE report's ablations, as plain Python.

``variants`` defines each ablation's grid and sizes, ``run`` plans and trains the (variant, seed)
runs with cached, resumable outputs, ``gates`` measures gate distributions from final weights, and
``report`` turns the runs into tables, plots and verdicts. ``flows/ablate.py`` composes them in Prefect.
"""
