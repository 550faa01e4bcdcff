"""Kernel sources (C++/CUDA) compiled on first use; see :mod:`galip.runtime.lmi_native`."""
