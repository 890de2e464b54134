"""Bench recipes shipped with mergeplug: ``mergeplug bench NAME`` runs ``NAME.yaml`` from this folder."""
