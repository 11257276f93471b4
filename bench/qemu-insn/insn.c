/*
 * A QEMU TCG plugin that counts executed guest instructions, for bench/arm-insns.sh.
 *
 *   gcc -O2 -shared -fPIC -fvisibility=hidden -o insn.so insn.c
 *   qemu-aarch64 -plugin ./insn.so,out=counts.txt [-cpu ...] PROGRAM ARGS...
 *
 * Arguments (each `-plugin insn.so,KEY=VALUE,...`):
 *   out=PATH     write the counts there at exit (default: stderr)
 *   mode=cb      (default) a call at each executed block adds its instruction count to
 *                the counter of the vCPU running it, each vCPU (under qemu-user: each
 *                guest thread) its own, so threads running at once lose nothing
 *   mode=inline  generated code adds to one shared counter instead: faster, but the
 *                addition is not atomic, so guest threads running at once can lose counts
 *   verbose=on   also print (stderr) the API levels QEMU reports and the guest architecture
 *
 * Output, one `key value` a line:
 *   insns 123456789     total over every vCPU
 *   vcpus 2             vCPUs that executed code (cb mode; 1 in inline mode)
 *   vcpu 0 123000000    per vCPU (cb mode)
 *
 * A block's instructions are counted when it starts, so a block left part-way (a fault, a
 * signal) counts whole: the error is a few instructions per such event. Only the process
 * QEMU started reports; a child it forks without exec is not counted.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "qemu-plugin-api.h"

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

/* Under qemu-user a vCPU index is unique among live threads (a new thread takes the
 * lowest index above every live one), so 256 covers any guest with fewer threads alive at
 * once; beyond that, counts go to one shared atomic counter. Each counter has its own
 * cache line so that threads do not contend. */
#define MAX_VCPUS 256

struct counter {
    uint64_t n;
    char pad[64 - sizeof(uint64_t)];
};

static struct counter per_vcpu[MAX_VCPUS] __attribute__((aligned(64)));
static uint64_t overflow;   /* vCPUs at MAX_VCPUS and above, added atomically */
static uint64_t shared;     /* mode=inline */
static bool inline_mode;
static FILE *out;
static pid_t owner;

static void tb_exec(unsigned int vcpu, void *udata)
{
    uint64_t n = (uint64_t)(uintptr_t)udata;
    if (vcpu < MAX_VCPUS) {
        per_vcpu[vcpu].n += n;
    } else {
        __atomic_fetch_add(&overflow, n, __ATOMIC_RELAXED);
    }
}

static void tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (inline_mode) {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &shared, n);
    } else {
        qemu_plugin_register_vcpu_tb_exec_cb(tb, tb_exec, QEMU_PLUGIN_CB_NO_REGS,
                                             (void *)(uintptr_t)n);
    }
}

static void report(qemu_plugin_id_t id, void *udata)
{
    (void)id;
    (void)udata;
    if (getpid() != owner) {
        return;
    }
    uint64_t total = shared + __atomic_load_n(&overflow, __ATOMIC_RELAXED);
    unsigned vcpus = inline_mode ? 1 : 0;
    for (unsigned i = 0; i < MAX_VCPUS; i++) {
        total += per_vcpu[i].n;
        vcpus += per_vcpu[i].n != 0;
    }
    char buf[64 * 40];
    size_t len = 0;
    len += snprintf(buf + len, sizeof buf - len, "insns %" PRIu64 "\nvcpus %u\n", total,
                    vcpus);
    for (unsigned i = 0; i < MAX_VCPUS && len < sizeof buf - 64; i++) {
        if (per_vcpu[i].n) {
            len += snprintf(buf + len, sizeof buf - len, "vcpu %u %" PRIu64 "\n", i,
                            per_vcpu[i].n);
        }
    }
    if (overflow) {
        len += snprintf(buf + len, sizeof buf - len, "vcpu %u+ %" PRIu64 "\n", MAX_VCPUS,
                        overflow);
    }
    if (out) {
        fputs(buf, out);
        fclose(out);
        out = NULL;
    } else {
        fputs(buf, stderr);
    }
}

static int fail(const char *what, const char *arg)
{
    fprintf(stderr, "insn plugin: %s: %s\n", what, arg);
    return 1;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    bool verbose = false;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "out=", 4) == 0) {
            if (out) {
                fclose(out);
            }
            /* Opened now so that a bad path fails before the guest runs. */
            out = fopen(a + 4, "w");
            if (!out) {
                return fail(strerror(errno), a + 4);
            }
        } else if (strcmp(a, "mode=cb") == 0) {
            inline_mode = false;
        } else if (strcmp(a, "mode=inline") == 0) {
            inline_mode = true;
        } else if (strcmp(a, "verbose=on") == 0 || strcmp(a, "verbose=true") == 0) {
            verbose = true;
        } else {
            return fail("unknown argument (out=PATH, mode=cb|inline, verbose=on)", a);
        }
    }
    if (verbose) {
        char buf[200];
        snprintf(buf, sizeof buf,
                 "insn plugin: target %s, QEMU plugin API %d..%d (this plugin: %d), %s, "
                 "mode %s\n",
                 info->target_name, info->version.min, info->version.cur,
                 QEMU_PLUGIN_VERSION, info->system_emulation ? "system" : "user",
                 inline_mode ? "inline" : "cb");
        fputs(buf, stderr);
    }
    owner = getpid();
    qemu_plugin_register_vcpu_tb_trans_cb(id, tb_trans);
    qemu_plugin_register_atexit_cb(id, report, NULL);
    return 0;
}
