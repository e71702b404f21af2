"""One module per op: input checks, the reference implementation, the custom-op registration
(fake kernel and autograd) and the public function that dispatches between backends."""
