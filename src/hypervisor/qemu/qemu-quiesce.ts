import { messageOf } from '../../core/errors.ts';
import type { QuiescePlan } from '../hypervisor.ts';
import { GuestAgent, guestAgentQuiesce } from './guest-agent.ts';

/**
 * Quiescing when asked: through the VM's guest agent (its host-side socket) if it has one and it answers;
 * otherwise the backup goes on crash-consistent and the note says so (never silently).
 */
export async function planQemuQuiesce(qgaSocketPath: string | null | undefined, wanted: boolean): Promise<QuiescePlan> {
  const none = (note: string | null): QuiescePlan => ({ note, async [Symbol.asyncDispose]() {} });
  if (!wanted) return none(null);
  if (!qgaSocketPath) return none('not quiesced: the VM has no guest agent configured (snapshift host add … --qga PATH); the backup is crash-consistent');
  let agent: GuestAgent;
  try {
    agent = await GuestAgent.connect(qgaSocketPath);
  } catch (error) {
    return none(`not quiesced: the guest agent did not answer (${messageOf(error)}); the backup is crash-consistent`);
  }
  return {
    quiesce: guestAgentQuiesce(agent),
    note: 'quiesced: guest file systems frozen through the guest agent at the point in time (VM snapshot or fleecing start)',
    async [Symbol.asyncDispose]() {
      await agent.close();
    },
  };
}
