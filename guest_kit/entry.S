/* CPL0 entry, interrupt stubs and the drop to user mode.  Everything in this file's .text runs at
 * CPL0, where this machine's KVM emulates instructions one by one: keep it short and use only
 * plain integer instructions (tests/unit/test_guest_kit_build.py scans the .ktext section). */
#include "abi.h"

	.section .text, "ax"
	.code64

/* rdi = vCPU index, rsi = command line, rdx = number of vCPUs (docs/guest_abi.md). */
	.globl _start
_start:
	cli
	cld
	test	%rdi, %rdi
	jnz	ap_start
	mov	$(gk_kstack + KSTACK_SIZE), %rsp
	mov	%rsi, %r12
	mov	%rdx, %r13
	call	kernel_init
	/* iretq frame into the CPL3 program: ss, rsp, rflags (IF=0, IOPL=0), cs, rip. */
	pushq	$SEL_UDATA
	pushq	$(gk_ustack + USTACK_SIZE)
	pushq	$0x2
	pushq	$SEL_UCODE
	pushq	$user_start
	mov	%r12, %rdi
	mov	%r13, %rsi
	xor	%eax, %eax
	xor	%ecx, %ecx
	xor	%edx, %edx
	iretq

/* Application processors: own stack, check in, then halt with interrupts off for good. */
ap_start:
	cmp	$MAX_CPUS, %rdi
	jae	ap_halt
	mov	%rdi, %rax
	inc	%rax
	shl	$10, %rax		/* AP_STACK_SIZE == 1024 */
	lea	gk_ap_stacks(%rax), %rsp
	mov	$1, %eax
	lock xaddl %eax, gk_ap_checkin
ap_halt:
	cli
	hlt
	jmp	ap_halt

/* Exception stubs, 16 bytes apart: exc_stubs + 16 * vector.  The CPU pushes an error code for
 * vectors 8, 10-14, 17, 21, 29 and 30; the others push a zero so the frame is always the same. */
	.balign 16
	.globl exc_stubs
exc_stubs:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.balign 16
	.if (\v == 8) || (\v >= 10 && \v <= 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
	.else
	pushq	$0
	.endif
	pushq	$\v
	jmp	exc_common
	.endr

exc_common:
	mov	%rsp, %rdi		/* struct exc_frame: vector, error, rip, cs, rflags, rsp, ss */
	and	$-16, %rsp
	call	exc_report		/* never returns */
1:	cli
	hlt
	jmp	1b

/* Interrupt stubs for vectors 0x20-0x30 (8259 lines and the APIC timer), 16 bytes apart. */
	.balign 16
	.globl irq_stubs
irq_stubs:
	.irp v, 0x20,0x21,0x22,0x23,0x24,0x25,0x26,0x27,0x28,0x29,0x2a,0x2b,0x2c,0x2d,0x2e,0x2f,0x30
	.balign 16
	pushq	$\v
	jmp	irq_common
	.endr

irq_common:
	push	%rax
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	push	%r8
	push	%r9
	push	%r10
	push	%r11
	mov	72(%rsp), %rdi		/* the vector pushed by the stub */
	sub	$8, %rsp		/* 16-byte alignment at the call */
	call	irq_dispatch
	add	$8, %rsp
	pop	%r11
	pop	%r10
	pop	%r9
	pop	%r8
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	pop	%rax
	add	$8, %rsp
	iretq

/* Spurious local-APIC interrupt: no EOI. */
	.globl apic_spurious_stub
apic_spurious_stub:
	iretq

/* System calls: `int3` from CPL3, through a DPL3 interrupt gate on vector 3 (IF stays clear).
 * On this machine's kvm_pvm, `int N` (0xcd) raises #UD from CPL3 and `syscall` reaches LSTAR
 * without leaving CPL3; the one-byte `int3` is delivered like on hardware.  rax = number,
 * rdi/rsi/rdx = arguments, result in rax, every other register kept. */
	.globl syscall_stub
syscall_stub:
	push	%rcx
	push	%rdx
	push	%rsi
	push	%rdi
	push	%r8
	push	%r9
	push	%r10
	push	%r11
	sub	$8, %rsp		/* 16-byte alignment at the call */
	mov	%rdx, %rcx
	mov	%rsi, %rdx
	mov	%rdi, %rsi
	mov	%rax, %rdi
	call	syscall_dispatch
	add	$8, %rsp
	pop	%r11
	pop	%r10
	pop	%r9
	pop	%r8
	pop	%rdi
	pop	%rsi
	pop	%rdx
	pop	%rcx
	iretq

/* CPL3 from here on: the test program's entry (rdi = command line, rsi = vCPU count). */
	.section .utext, "ax"
	.globl user_start
user_start:
	and	$-16, %rsp
	call	user_main
	ud2

	.section .bss
	.balign 16
	.globl gk_kstack, gk_ustack, gk_ap_stacks
gk_kstack:
	.skip KSTACK_SIZE
gk_ustack:
	.skip USTACK_SIZE
gk_ap_stacks:
	.skip AP_STACK_SIZE * (MAX_CPUS + 1)
