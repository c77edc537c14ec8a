"""Loading guests: CPU entry state (`cpu`), ELF images (`elf`), Linux (`linux`)."""

# What a Linux guest gets without --cmdline: our UART as console (early too), no PS/2 aux probe
# (the i8042 has no mouse), reboot through the i8042, and a panic ends the VM.
DEFAULT_LINUX_CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 i8042.noaux reboot=k panic=-1"
