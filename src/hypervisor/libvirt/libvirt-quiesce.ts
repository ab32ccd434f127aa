import { messageOf } from '../../core/errors.ts';
import type { QuiescePlan } from '../hypervisor.ts';
import type { Virsh } from './virsh.ts';

/**
 * Quiescing when asked, through the domain's guest agent as libvirt reaches it (`domfsfreeze`/`domfsthaw`
 * around the VM snapshot); when the agent is not configured or does not answer `guest-ping`, the backup goes
 * on crash-consistent and the note says so (never silently), as on QEMU hosts.
 */
export async function planLibvirtQuiesce(virsh: Virsh, domain: string, wanted: boolean): Promise<QuiescePlan> {
  const none = (note: string | null): QuiescePlan => ({ note, async [Symbol.asyncDispose]() {} });
  if (!wanted) return none(null);
  let answers: boolean;
  try {
    answers = await virsh.agentPing(domain, { timeoutMs: 15_000 });
  } catch (error) {
    return none(`not quiesced: the guest agent of domain ${domain} could not be asked (${messageOf(error)}); the backup is crash-consistent`);
  }
  if (!answers) return none(`not quiesced: domain ${domain} has no guest agent, or it did not answer; the backup is crash-consistent`);
  return {
    quiesce: {
      async freeze() {
        await virsh.fsFreeze(domain);
      },
      async thaw() {
        await virsh.fsThaw(domain);
      },
    },
    note: 'quiesced: guest file systems frozen through the guest agent (libvirt domfsfreeze) at the point in time (VM snapshot or fleecing start)',
    async [Symbol.asyncDispose]() {},
  };
}
