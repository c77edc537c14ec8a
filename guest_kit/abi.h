/* Shared constants of the test guest: the guest ABI numbers (docs/guest_abi.md, mirrored from
 * vmm_core/layout.py) and the contract between the CPL0 kernel (entry.S, kernel.c) and the CPL3
 * test program (everything else).  Included by C and assembly. */
#ifndef GK_ABI_H
#define GK_ABI_H

/* Selectors: the same slots as the VMM's entry GDT (vmm_core/boot/cpu.py). */
#define SEL_KCODE 0x10
#define SEL_KDATA 0x18
#define SEL_UDATA 0x23 /* 0x20 | RPL 3 */
#define SEL_UCODE 0x2b /* 0x28 | RPL 3 */
#define SEL_TSS 0x30

/* Interrupt vectors. */
#define VEC_PIC_BASE 0x20   /* 8259 lines 0-15 -> 0x20-0x2f */
#define VEC_SYSCALL 3       /* `int3` from CPL3: the system-call gate (DPL3), see entry.S */
#define VEC_TIMER 0x30      /* local APIC one-shot timer (wait_irq timeouts) */
#define VEC_APIC_SPURIOUS 0xff

/* System calls (`int3`): rax = number, arguments in rdi, rsi, rdx; result in rax; every other
 * register kept. */
#define SYS_WRITE 1    /* (buf, len) -> len: bytes to COM1 */
#define SYS_WAIT_IRQ 2 /* (line mask, timeout_ms) -> fired lines | WAIT_TIMEOUT | halts << 32 */
#define SYS_PIO 3      /* (port | size << 16 | PIO_WRITE, value) -> value read */
#define SYS_EXIT 4     /* (code): never returns */

#define WAIT_TIMEOUT (1 << 16)
#define PIO_WRITE (1 << 24)

#define MAX_CPUS 64
#define KSTACK_SIZE 16384
#define AP_STACK_SIZE 1024
#define USTACK_SIZE 65536

/* Guest-physical addresses and ports. */
#define TESTDEV_BASE 0xc0000000UL
#define TD_EXIT 0x000
#define TD_PUTC 0x004
#define TD_MARK 0x008
#define TD_LAST_SIZE 0x010
#define TD_LAST_OFFSET 0x018
#define TD_LAST_VALUE 0x020
#define TD_IRQ_LINE 0x030
#define TD_IRQFD 0x034
#define TD_IRQ_COUNT 0x038
#define TD_VCPUS 0x040
#define TD_PROBE 0x100
#define TD_PROBE_SIZE 0x100
#define TESTDEV_IRQFD_GSI 3
#define ACPI_SLEEP_CONTROL_PORT 0x3C0 /* FADT SLEEP_CONTROL_REG (vmm_core/acpi/tables.py) */
#define ACPI_S5_SLP_TYP 5
#define ACPI_SLP_EN (1 << 5)
#define ACPI_GED_IRQ 13 /* the ACPI power button's Generic Event Device line (vmm_core/layout.py) */

#define COM1_PORT 0x3f8
#define DEBUG_EXIT_PORT 0x501
#define PIO_PROBE_PORT 0x510
#define PIO_PROBE_SIZE 0x10
#define PIC1_CMD 0x20
#define PIC1_DATA 0x21
#define PIC2_CMD 0xa0
#define PIC2_DATA 0xa1
#define LAPIC_BASE 0xfee00000UL

#define VIRTIO_MMIO_BASE 0xd0000000UL
#define VIRTIO_MMIO_SLOT_SIZE 0x1000
#define VIRTIO_MMIO_MAX_SLOTS 64

/* RAM the virtio drivers use (the image, stacks and bss end well below 8 MiB). */
#define VRING_AREA 0x800000UL   /* 64 KiB per virtio-mmio slot: 4 queues x 16 KiB */
#define VBUF_AREA 0xc00000UL    /* 256 KiB of buffers per slot */

#ifndef __ASSEMBLER__
#include <stdint.h>
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* Kernel state the CPL3 program reads directly (every page is user-accessible). */
extern volatile u32 gk_irq_counts[256]; /* interrupts taken, per vector */
extern volatile u32 gk_ap_checkin;      /* APs that reached their halt loop */
#endif

#endif
