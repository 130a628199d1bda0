"""``vpipe tune``: a search over ``vpipe train`` options with Optuna (TPE sampler, median
pruner on the per-epoch validation figure). ``space`` reads the ``--search`` terms; ``trial``
trains one trial's run folder with the one loop; ``runners`` run trials here, in a pool of
processes or as Ray tasks; ``study`` drives the search and its folder; ``summary`` and
``table`` say what it found. Optuna is the ``tune`` extra, imported only here."""
