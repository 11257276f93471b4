/*
 * The part of QEMU's TCG plugin API that insn.c uses, declared for QEMU 7.2's ABI.
 *
 * QEMU installs no plugin header on Debian, so this file states only what the plugin
 * needs. What must agree with the QEMU that loads the plugin:
 *
 * - `qemu_plugin_version`: an exported int. QEMU 7.2 refuses a plugin that lacks it, and
 *   one whose value lies outside [QEMU_PLUGIN_MIN_VERSION, QEMU_PLUGIN_VERSION] of its own,
 *   which for 7.2 is [0, 1] (checked: 7.2 loads this plugin at 1 and refuses it at 2).
 *   Later QEMUs raised the level and replaced the inline op used here by per-vCPU
 *   variants, so a newer QEMU needs this file revisited. insn.c prints the range QEMU
 *   reports (qemu_info_t.version) with `verbose=on`.
 * - `qemu_plugin_install`: the exported entry point, called once at load.
 * - the layout of qemu_info_t, which insn.c reads, and the values of the two enums,
 *   which it passes in.
 * - the signatures of the functions below, which QEMU's executable exports and the
 *   dynamic loader binds when the plugin is loaded (hence no library to link against).
 */
#ifndef SHELFWATCH_QEMU_PLUGIN_API_H
#define SHELFWATCH_QEMU_PLUGIN_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define QEMU_PLUGIN_EXPORT __attribute__((visibility("default")))

/* The API level this plugin is written against (QEMU 7.2 accepts 0 and 1). */
#define QEMU_PLUGIN_VERSION 1

typedef uint64_t qemu_plugin_id_t;

extern QEMU_PLUGIN_EXPORT int qemu_plugin_version;

typedef struct qemu_info_t {
    const char *target_name;          /* "aarch64", "arm", ... */
    struct {
        int min;                      /* oldest API level this QEMU accepts */
        int cur;                      /* newest */
    } version;
    bool system_emulation;            /* false under qemu-user */
    union {
        struct {
            int smp_vcpus;
            int max_vcpus;
        } system;                     /* only meaningful in system emulation */
    };
} qemu_info_t;

/* Opaque handle of a translation block, valid during the translation callback. */
struct qemu_plugin_tb;

enum qemu_plugin_cb_flags {
    QEMU_PLUGIN_CB_NO_REGS,
    QEMU_PLUGIN_CB_R_REGS,
    QEMU_PLUGIN_CB_RW_REGS,
};

enum qemu_plugin_op {
    QEMU_PLUGIN_INLINE_ADD_U64,
};

typedef void (*qemu_plugin_udata_cb_t)(qemu_plugin_id_t id, void *userdata);
typedef void (*qemu_plugin_vcpu_udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*qemu_plugin_vcpu_tb_trans_cb_t)(qemu_plugin_id_t id,
                                               struct qemu_plugin_tb *tb);

/* Entry point: 0 on success; anything else makes QEMU exit with an error. */
QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv);

/* Called each time a block of guest code is translated (not each time it runs). */
void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id,
                                           qemu_plugin_vcpu_tb_trans_cb_t cb);

/* Guest instructions in the block being translated. */
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);

/* Calls cb(vcpu_index, userdata) each time the block starts executing. */
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb,
                                          qemu_plugin_vcpu_udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags,
                                          void *userdata);

/* Generated code adds imm to *(uint64_t *)ptr each time the block starts executing;
 * not atomic, so counts from guest threads running at once can be lost. */
void qemu_plugin_register_vcpu_tb_exec_inline(struct qemu_plugin_tb *tb,
                                              enum qemu_plugin_op op,
                                              void *ptr, uint64_t imm);

/* Calls cb(id, userdata) when the guest exits (under qemu-user: exit/exit_group). */
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, qemu_plugin_udata_cb_t cb,
                                    void *userdata);

#endif
