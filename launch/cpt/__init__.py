"""The continual pre-training (CPT) experiment behind ``ecpt experiment cpt``."""
