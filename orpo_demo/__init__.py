"""`make demo`: the whole pipeline on an embedded tiny model this package builds itself.

Not part of the product: training (orpo_plugin) and serving (serve) never import it. It ships in
the same distribution so that `python -m orpo_demo` works from any install.
"""
