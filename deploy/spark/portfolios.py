"""spark-submit entry point of the portfolio run, with the options of ``python -m index_builder
portfolios`` (the engine is Spark, the master spark-submit's)::

    spark-submit --master spark://host:7077 deploy/spark/portfolios.py \
        --artifacts /shared/artifacts --campaign campaign.toml --out /shared/portfolios/week_49

A script outside the package: spark-submit puts a script's own folder first on ``sys.path``,
where the package's modules would hide the standard library's of the same name (``profile``).
"""

import sys

from index_builder.__main__ import main
from index_builder.portfolio_spark import ENGINE

if __name__ == "__main__":
    sys.exit(main(["portfolios", "--engine", ENGINE, *sys.argv[1:]]))
