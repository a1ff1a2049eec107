"""What libvirt knows: the domain XML, guest addresses, its API, its status files and
domains' own forwards.
"""
