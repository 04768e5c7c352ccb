"""Datasets, degradations and the LightningDataModule."""
