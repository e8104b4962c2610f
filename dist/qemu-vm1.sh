#!/bin/sh
# vm1 run by hand on its tracker's disks (NBD over the unix socket), exactly as
#   vmreplica vm render dist/vm1.toml \
#       --disk sys='nbd+unix:///sys?socket=/var/lib/vmreplica/vm1/nbd.sock' \
#       --disk data='nbd+unix:///data?socket=/var/lib/vmreplica/vm1/nbd.sock'
# prints it (tests/dist.rs checks that they agree). Start the tracker first
# (systemctl start vmreplica-tracker@vm1).
mkdir -p /run/vmreplica/vm/vm1
exec qemu-system-x86_64 \
    -name vm1 \
    -machine q35,accel=kvm \
    -cpu host \
    -smp 2 \
    -m 4096 \
    -drive 'file=nbd+unix:///sys?socket=/var/lib/vmreplica/vm1/nbd.sock,file.reconnect-delay=30,format=raw,if=virtio,cache=none' \
    -drive 'file=nbd+unix:///data?socket=/var/lib/vmreplica/vm1/nbd.sock,file.reconnect-delay=30,format=raw,if=virtio,cache=none' \
    -qmp unix:/run/vmreplica/vm/vm1/qmp.sock,server=on,wait=off \
    -chardev socket,id=qga0,path=/run/vmreplica/vm/vm1/qga.sock,server=on,wait=off \
    -device virtio-serial-pci \
    -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
    -serial file:/run/vmreplica/vm/vm1/console.log \
    -display none \
    -nic bridge,br=br0,model=virtio-net-pci,mac=52:54:00:5e:00:01
