"""Estimators of tissue parameters from fingerprints: the CRB-trained network, NLLS and dictionary matching."""
