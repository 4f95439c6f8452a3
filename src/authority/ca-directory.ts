// Read-only view of the CA hierarchy: needs the store only, never a key or passphrase.

import { HallmarkError } from '../errors.js';
import type { KeyRef } from '../keys/key-backend.js';
import type { Store } from '../store/database.js';
import type { CaRow, CaStatus } from '../store/schema.js';
import type { HomeConfig } from './home.js';

export interface CaInfo {
  readonly name: string;
  readonly role: 'root' | 'intermediate';
  readonly status: CaStatus | 'expired';
  readonly parent: string | null;
  readonly subject: string;
  readonly keyId: string;
  readonly keyAlgorithm: string;
  readonly keyLocation: string;
  readonly serial: string | null;
  readonly notBefore: string | null;
  readonly notAfter: string | null;
  readonly pathLen: number | null;
  readonly isDefaultIssuer: boolean;
}

function caStatus(row: CaRow, now = new Date()): CaInfo['status'] {
  if (row.status === 'active' && row.not_after && new Date(row.not_after) <= now) return 'expired';
  return row.status;
}

export function describeKeyRef(ref: string | null): string {
  if (!ref) return 'offline (root directory)';
  const k = JSON.parse(ref) as KeyRef;
  return k.backend === 'pkcs11' ? k.id : `file:${k.id}`;
}

export class CaDirectory {
  readonly store: Store;
  readonly config: HomeConfig;
  constructor(store: Store, config: HomeConfig) {
    this.store = store;
    this.config = config;
  }


  async listCas(): Promise<CaInfo[]> {
    const rows = await this.store.db.selectFrom('certificate_authorities').selectAll().orderBy('id').execute();
    const byId = new Map(rows.map((r) => [r.id, r]));
    return rows.map((r) => ({
      name: r.name,
      role: r.role,
      status: caStatus(r),
      parent: r.parent_id === null ? null : byId.get(r.parent_id)?.name ?? null,
      subject: r.subject,
      keyId: r.ski,
      keyAlgorithm: r.key_algorithm,
      keyLocation: describeKeyRef(r.key_ref),
      serial: r.serial,
      notBefore: r.not_before,
      notAfter: r.not_after,
      pathLen: r.path_len,
      isDefaultIssuer: r.name === this.config.defaultIssuer,
    }));
  }

  async caRow(name: string): Promise<CaRow> {
    const row = await this.store.db.selectFrom('certificate_authorities').selectAll().where('name', '=', name).executeTakeFirst();
    if (!row) throw new HallmarkError('CA_NOT_FOUND', `no CA named ${JSON.stringify(name)}`);
    return row;
  }

  /** The certificate of CA `name` and, with `chain`, its issuers up to the root (DER, leaf first). */
  async caChain(name: string, chain = true): Promise<Buffer[]> {
    const out: Buffer[] = [];
    let row: CaRow | undefined = await this.caRow(name);
    while (row) {
      if (!row.certificate_der) throw new HallmarkError('CA_NOT_ACTIVE', `CA ${row.name} has no certificate yet (pending installation)`);
      out.push(Buffer.from(row.certificate_der));
      if (!chain || row.parent_id === null) break;
      row = await this.store.db.selectFrom('certificate_authorities').selectAll().where('id', '=', row.parent_id).executeTakeFirst();
    }
    return out;
  }

  async rootName(): Promise<string> {
    const row = await this.store.db.selectFrom('certificate_authorities').select('name').where('role', '=', 'root').where('status', '=', 'active').orderBy('id', 'desc').executeTakeFirst();
    if (!row) throw new HallmarkError('CA_NOT_FOUND', 'no active root CA');
    return row.name;
  }
}
