"""cffi API-mode build of the KVM bindings: struct layouts and ioctl numbers come from <linux/kvm.h>.

Built by setup.py (`cffi_modules`) into `vmm_core.kvm._kvm_cffi`.  Fields inside kvm_run's exit
union are exported as offsets computed by the C compiler (`offsetof`), so the Python run loop can
decode exits with `struct.unpack_from` on the shared kvm_run page without per-field cffi overhead.
"""

from cffi import FFI

ffibuilder = FFI()

IOCTLS = [
    # system
    "KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_CHECK_EXTENSION", "KVM_GET_VCPU_MMAP_SIZE",
    "KVM_GET_SUPPORTED_CPUID", "KVM_GET_MSR_INDEX_LIST",
    # vm
    "KVM_CREATE_VCPU", "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR",
    "KVM_CREATE_IRQCHIP", "KVM_CREATE_PIT2", "KVM_IRQ_LINE", "KVM_IRQFD", "KVM_IOEVENTFD",
    "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP",
    # vcpu
    "KVM_RUN", "KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_GET_FPU",
    "KVM_SET_FPU", "KVM_GET_MSRS", "KVM_SET_MSRS", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "KVM_SET_CPUID2",
    "KVM_GET_MP_STATE", "KVM_SET_MP_STATE",
]

CONSTANTS = [
    "KVM_API_VERSION",
    "KVM_EXIT_UNKNOWN", "KVM_EXIT_EXCEPTION", "KVM_EXIT_IO", "KVM_EXIT_HYPERCALL", "KVM_EXIT_DEBUG",
    "KVM_EXIT_HLT", "KVM_EXIT_MMIO", "KVM_EXIT_IRQ_WINDOW_OPEN", "KVM_EXIT_SHUTDOWN",
    "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_INTR", "KVM_EXIT_SET_TPR", "KVM_EXIT_TPR_ACCESS",
    "KVM_EXIT_NMI", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_SYSTEM_EVENT",
    "KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT",
    "KVM_SYSTEM_EVENT_SHUTDOWN", "KVM_SYSTEM_EVENT_RESET", "KVM_SYSTEM_EVENT_CRASH",
    "KVM_CAP_IRQCHIP", "KVM_CAP_HLT", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR",
    "KVM_CAP_EXT_CPUID", "KVM_CAP_NR_VCPUS", "KVM_CAP_MAX_VCPUS", "KVM_CAP_PIT2", "KVM_CAP_IRQFD",
    "KVM_CAP_IOEVENTFD", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_NR_MEMSLOTS", "KVM_CAP_SET_IDENTITY_MAP_ADDR",
    "KVM_CAP_MP_STATE",
    "KVM_IOEVENTFD_FLAG_DATAMATCH", "KVM_IOEVENTFD_FLAG_PIO", "KVM_IOEVENTFD_FLAG_DEASSIGN",
    "KVM_IRQFD_FLAG_DEASSIGN", "KVM_PIT_SPEAKER_DUMMY",
    "KVM_MP_STATE_RUNNABLE", "KVM_MP_STATE_UNINITIALIZED",
]

OFFSETS = {
    "OFF_EXIT_REASON": "exit_reason",
    "OFF_IMMEDIATE_EXIT": "immediate_exit",
    "OFF_IO_DIRECTION": "io.direction",
    "OFF_IO_SIZE": "io.size",
    "OFF_IO_PORT": "io.port",
    "OFF_IO_COUNT": "io.count",
    "OFF_IO_DATA_OFFSET": "io.data_offset",
    "OFF_MMIO_PHYS_ADDR": "mmio.phys_addr",
    "OFF_MMIO_DATA": "mmio.data",
    "OFF_MMIO_LEN": "mmio.len",
    "OFF_MMIO_IS_WRITE": "mmio.is_write",
    "OFF_FAIL_ENTRY_REASON": "fail_entry.hardware_entry_failure_reason",
    "OFF_HW_EXIT_REASON": "hw.hardware_exit_reason",
    "OFF_INTERNAL_SUBERROR": "internal.suberror",
    "OFF_INTERNAL_NDATA": "internal.ndata",
    "OFF_INTERNAL_DATA": "internal.data",
    "OFF_SYSTEM_EVENT_TYPE": "system_event.type",
}

CDEF = """
struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags; uint64_t guest_phys_addr; uint64_t memory_size; uint64_t userspace_addr;
};
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector; uint8_t type; uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable; uint8_t padding;
};
struct kvm_dtable { uint64_t base; uint16_t limit; uint16_t padding[3]; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss; struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8; uint64_t efer; uint64_t apic_base;
    unsigned long long interrupt_bitmap[4];
};
struct kvm_fpu {
    uint8_t fpr[8][16]; uint16_t fcw; uint16_t fsw; uint8_t ftwx; uint8_t pad1; uint16_t last_opcode;
    uint64_t last_ip; uint64_t last_dp; uint8_t xmm[16][16]; uint32_t mxcsr; uint32_t pad2;
};
struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; };
struct kvm_lapic_state { char regs[1024]; };
struct kvm_irq_level { uint32_t irq; uint32_t level; };
struct kvm_irqfd { uint32_t fd; uint32_t gsi; uint32_t flags; uint32_t resamplefd; ...; };
struct kvm_ioeventfd { uint64_t datamatch; uint64_t addr; uint32_t len; int32_t fd; uint32_t flags; ...; };
struct kvm_pit_config { uint32_t flags; ...; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_cpuid_entry2 {
    uint32_t function; uint32_t index; uint32_t flags; uint32_t eax, ebx, ecx, edx; ...;
};
struct kvm_cpuid2 { uint32_t nent; uint32_t padding; struct kvm_cpuid_entry2 entries[]; };

int bh_ioctl_ptr(int fd, unsigned long request, void *arg);
int bh_ioctl_int(int fd, unsigned long request, unsigned long arg);
"""
CDEF += "".join(f"#define {name} ...\n" for name in IOCTLS + CONSTANTS)
CDEF += "".join(f"static const int BH_{name};\n" for name in OFFSETS)

SOURCE = """
#include <stddef.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

/* ioctl is variadic; these fixed-signature wrappers let cffi pass a pointer or a full-width
   unsigned long (Python's fcntl.ioctl would truncate an int argument to a C int). */
static int bh_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
static int bh_ioctl_int(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }
"""
SOURCE += "".join(
    f"static const int BH_{name} = (int)offsetof(struct kvm_run, {field});\n"
    for name, field in OFFSETS.items())

ffibuilder.cdef(CDEF)
ffibuilder.set_source("vmm_core.kvm._kvm_cffi", SOURCE)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
