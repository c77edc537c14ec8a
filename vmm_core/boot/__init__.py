"""Loading guests: CPU entry state (`cpu`), ELF images (`elf`), Linux (`linux`)."""
