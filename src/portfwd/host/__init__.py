"""The host's kernel and firewalls: nftables, netlink/sysfs/proc readers, libvirt's
firewall, AppArmor.
"""
