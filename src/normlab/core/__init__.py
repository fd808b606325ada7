"""The shared core: NormSpec (which axes share statistics), stable statistics, autograd."""
