import type { HostRecord } from '../catalog/index.ts';
import { messageOf } from '../core/errors.ts';
import { GuestAgent, guestAgentQuiesce } from '../hypervisor/qemu/guest-agent.ts';

export interface QuiescePlan extends AsyncDisposable {
  /** Freeze/thaw to run around the VM snapshot, when the guest agent answers. */
  quiesce?: { freeze(): Promise<void>; thaw(): Promise<void> };
  /** What the session tells the admin; null when quiescing was not asked for. */
  note: string | null;
}

/**
 * Quiescing when asked: through the VM's guest agent if it has one and it answers; otherwise the backup
 * goes on crash-consistent and the note says so (never silently).
 */
export async function planQuiesce(host: HostRecord, wanted: boolean): Promise<QuiescePlan> {
  const none = (note: string | null): QuiescePlan => ({ note, async [Symbol.asyncDispose]() {} });
  if (!wanted) return none(null);
  if (!host.qgaSocketPath) return none('not quiesced: the VM has no guest agent configured (snapshift host add … --qga PATH); the backup is crash-consistent');
  let agent: GuestAgent;
  try {
    agent = await GuestAgent.connect(host.qgaSocketPath);
  } catch (error) {
    return none(`not quiesced: the guest agent did not answer (${messageOf(error)}); the backup is crash-consistent`);
  }
  return {
    quiesce: guestAgentQuiesce(agent),
    note: 'quiesced: guest file systems frozen through the guest agent during the VM snapshot',
    async [Symbol.asyncDispose]() {
      await agent.close();
    },
  };
}
