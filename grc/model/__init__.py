"""The PyTorch reference of HSTU and MTGR: the numerical oracle for every later stage."""
