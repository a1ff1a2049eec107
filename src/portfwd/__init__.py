"""portfwd: port forwarding for libvirt guests through one nftables table.

Kept empty of imports: the libvirt hook imports this package for every guest
and every phase, and must stay cheap.
"""

__version__ = "0.3.0"  # as pyproject.toml says
