"""Datasets, transforms, rare class sampling, the LightningDataModule and the synthetic dataset."""
