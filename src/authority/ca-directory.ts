// Read-only view of the CA hierarchy: needs the store only, never a key or passphrase.

import { HallmarkError } from '../errors.js';
import type { KeyRef } from '../keys/key-backend.js';
import { parseCertificate, type ParsedCertificate } from '../pki/certificate.js';
import { verifyIssuedBy } from '../pki/verify.js';
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

export function describeKeyRef(ref: string | null, role: string = 'root'): string {
  // Without a key reference: the offline root, or a factory station's CA (its key is in the station's token).
  if (!ref) return role === 'root' ? 'offline (root directory)' : 'offline (factory station token)';
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
      keyLocation: describeKeyRef(r.key_ref, r.role),
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

  /** The active roots, current (newest) first: more than one during a root rollover. */
  async activeRoots(): Promise<CaRow[]> {
    const rows = await this.store.db.selectFrom('certificate_authorities').selectAll().where('role', '=', 'root').where('status', '=', 'active').orderBy('id', 'desc').execute();
    return rows.filter((r) => r.certificate_der);
  }

  /**
   * The name of the active root that issued `cert` (its subject is the certificate's issuer and its key
   * verifies the signature): during a rollover an intermediate may come from the old or the new root.
   * Throws CA_CERT_MISMATCH when no active root signed it.
   */
  async issuingRootOf(cert: ParsedCertificate | Buffer): Promise<string> {
    const parsed = Buffer.isBuffer(cert) ? parseCertificate(cert) : cert;
    let nameMatched = false;
    for (const row of await this.activeRoots()) {
      const root = parseCertificate(Buffer.from(row.certificate_der!));
      if (!root.subject.equals(parsed.issuer)) continue;
      nameMatched = true;
      try {
        verifyIssuedBy(parsed, root);
        return row.name;
      } catch {
        // another root generation may share the name (it should not) — keep looking
      }
    }
    throw new HallmarkError('CA_CERT_MISMATCH', nameMatched ? 'the certificate signature does not verify with the key of the active root that has its issuer name' : 'the certificate was not issued by an active root CA (issuer name differs)');
  }

  /**
   * The root certificates to distribute during a rollover (RFC 7030 §4.1.3, RFC 4210 §4.4): the current
   * root (NewWithNew), then for each older active root NewWithOld, OldWithNew and the older root itself
   * (OldWithOld). The link certificates are the certificates rows of profile 'root' (recorded by
   * `hallmark root install-rollover`). Without a rollover: the root alone.
   */
  async rootCertificates(): Promise<Buffer[]> {
    const roots = await this.activeRoots();
    if (roots.length === 0) throw new HallmarkError('CA_NOT_FOUND', 'no active root CA');
    const out: Buffer[] = [Buffer.from(roots[0]!.certificate_der!)];
    if (roots.length === 1) return out;
    const ids = roots.map((r) => r.id);
    const links = (await this.store.db.selectFrom('certificates').select(['issuer_id', 'der']).where('profile', '=', 'root').where('status', '=', 'valid').where('issuer_id', 'in', ids).orderBy('id').execute())
      .map((l) => ({ issuerId: l.issuer_id, cert: parseCertificate(Buffer.from(l.der)) }));
    const parsed = new Map(roots.map((r) => [r.id, parseCertificate(Buffer.from(r.certificate_der!))]));
    for (let i = 1; i < roots.length; i++) {
      const newer = parsed.get(roots[i - 1]!.id)!;
      const older = parsed.get(roots[i]!.id)!;
      const newWithOld = links.find((l) => l.issuerId === roots[i]!.id && l.cert.subject.equals(newer.subject) && l.cert.subjectPublicKeyInfo.equals(newer.subjectPublicKeyInfo));
      const oldWithNew = links.find((l) => l.issuerId === roots[i - 1]!.id && l.cert.subject.equals(older.subject) && l.cert.subjectPublicKeyInfo.equals(older.subjectPublicKeyInfo));
      if (newWithOld) out.push(newWithOld.cert.der);
      if (oldWithNew) out.push(oldWithNew.cert.der);
      out.push(older.der);
    }
    return out;
  }
}
