"""Drop-in ``nn.Module`` wrappers around fastdistill's ops."""

__all__: list[str] = []
