"""Threshold fitting (cost model or unsupervised rules) and alarm evaluation."""
