// The enrolment decision every way in shares (EST today; the station and the agent's local paths go
// through it too): pick the authenticators whose credential the request carries, establish who the
// device is, check the label, and hand the request to the authority core, which checks state, key and
// quota and signs. A request no authenticator accepts is refused with its reasons in the audit log.

import type { Authority, IssuedCertificate } from '../authority/authority.js';
import { appendAudit } from '../audit/audit-log.js';
import { HallmarkError } from '../errors.js';
import { NotApplicable, type AuthenticatorContext, type EnrolmentAuthenticator, type EnrolmentIdentity, type EnrolmentRequest } from './authenticator.js';
import { birthCertificateAuthenticator } from './birth-certificate-authenticator.js';
import { claimAuthenticator } from './claim-authenticator.js';
import { currentCertificateAuthenticator } from './current-certificate-authenticator.js';
import { RateLimiter } from './rate-limit.js';
import { SPEND_APPROVAL, requireApproval } from './approvals.js';
import { callOf } from '../store/procedures.js';
import { udidOfKey } from '../registry/registry.js';
import { rawSql } from '../store/raw-sql.js';
import { registeredKeyAuthenticator } from './registered-key-authenticator.js';

/** Tried in this order; the first that accepts decides who the device is. */
export const AUTHENTICATORS: readonly EnrolmentAuthenticator[] = [currentCertificateAuthenticator, birthCertificateAuthenticator, claimAuthenticator, registeredKeyAuthenticator];

/** Refusals that end the attempt at once: the request chose its credential and it failed. */
const FINAL = new Set(['CLAIM_INVALID', 'RATE_LIMITED', 'CHANNEL_BINDING_MISMATCH']);

const weight = (err: HallmarkError): number => (err.code === 'EST_CREDENTIALS_REQUIRED' ? 0 : err instanceof NotApplicable ? 1 : 2);

export interface EnrolmentResult extends IssuedCertificate {
  readonly udid: string;
  readonly authenticator: string;
  readonly privateKeyPkcs8?: Buffer;
}

export class EnrolmentService {
  readonly #authority: Authority;
  readonly #context: AuthenticatorContext;

  constructor(authority: Authority, limiter = new RateLimiter()) {
    this.#authority = authority;
    this.#context = { store: authority.store, registry: authority.registry, limiter };
  }

  get limiter(): RateLimiter {
    return this.#context.limiter;
  }

  /** Is `label` a product or a line? (EST /.well-known/est/<label>/…) */
  async labelKind(label: string): Promise<'product' | 'line' | undefined> {
    const db = this.#authority.store.db;
    if (await db.selectFrom('products').select('id').where('name', '=', label).executeTakeFirst()) return 'product';
    if (await db.selectFrom('lines').select('id').where('name', '=', label).executeTakeFirst()) return 'line';
    return undefined;
  }

  async identify(request: EnrolmentRequest): Promise<EnrolmentIdentity> {
    const candidates = request.operation === 'reenroll' ? [currentCertificateAuthenticator] : AUTHENTICATORS.filter((a) => a.presentIn(request));
    if (request.operation === 'reenroll' && request.peerChain.length === 0) {
      throw new HallmarkError('EST_CREDENTIALS_REQUIRED', 're-enrolment needs the current certificate as the TLS client certificate');
    }
    const reasons: { authenticator: string; code: string; reason: string }[] = [];
    let first: HallmarkError | undefined;
    for (const authenticator of candidates) {
      try {
        return await authenticator.authenticate(request, this.#context);
      } catch (err) {
        if (!(err instanceof HallmarkError)) throw err;
        // A claim is a deliberate choice of credential: its refusal ends the attempt (no fallback to the CSR key).
        if (FINAL.has(err.code) || authenticator.name === 'claim') throw err;
        reasons.push({ authenticator: authenticator.name, code: err.code, reason: err.message });
        // Report the reason that says most: "not mine to judge" and the registered-key fallback's "no credential" say least.
        if (!first || weight(err) > weight(first)) first = err;
      }
    }
    await this.#authority.audit([{ actor: `est:${request.source}`, action: 'enrolment.refused', target: '-', details: { operation: request.operation, label: request.label ?? null, reasons } }]);
    throw first ?? new HallmarkError('EST_CREDENTIALS_REQUIRED', 'no credential was presented');
  }

  /** Identifies the device and has the authority issue its certificate. */
  async enrol(request: EnrolmentRequest): Promise<EnrolmentResult> {
    const identity = await this.identify(request);
    if (request.label !== undefined) {
      const owner = identity.newDevice
        ? await this.#authority.store.db.selectFrom('batches').innerJoin('products', 'products.id', 'batches.product_id').innerJoin('lines', 'lines.id', 'batches.line_id')
          .select(['products.name as product', 'lines.name as line']).where('batches.id', '=', identity.newDevice.batch).executeTakeFirstOrThrow()
        : await this.#authority.registry.device(identity.udid);
      if (owner.product !== request.label && owner.line !== request.label) {
        const err = new HallmarkError('ENROLMENT_REFUSED', `device ${identity.udid} is not of product or line ${request.label} (it is ${owner.product} on line ${owner.line})`);
        await this.#authority.store.writeTransaction((trx) => appendAudit(trx, [{ actor: identity.actor, action: 'enrolment.refused', target: identity.udid, details: { operation: request.operation, label: request.label, reason: err.message } }]));
        throw err;
      }
    }
    const approval = await this.#approvalFor(identity, request);
    const steps = [...(identity.steps ?? []), ...(approval ? [callOf(SPEND_APPROVAL, { approval, actor: identity.actor })] : [])];
    const issued = await this.#authority.issueForDevice({
      udid: identity.udid,
      csr: request.csr,
      csrKey: request.csrKey,
      actor: identity.actor,
      provenKeys: identity.provenKeys,
      serverKeygen: request.operation === 'serverkeygen',
      steps,
      newDevice: identity.newDevice,
      renewal: identity.renewal,
      auditDetails: { ...identity.details, operation: request.operation, source: request.source, ...(request.label ? { label: request.label } : {}) },
    });
    return { ...issued, udid: identity.udid, authenticator: identity.authenticator };
  }

  /**
   * A device's first identity in a batch that requires approval: the approval to spend, or ENROLMENT_PENDING
   * (202) / ENROLMENT_REJECTED. undefined when no approval is needed.
   */
  async #approvalFor(identity: EnrolmentIdentity, request: EnrolmentRequest): Promise<string | undefined> {
    const store = this.#authority.store;
    // One statement per enrolment (hand-written: src/store/raw-sql.ts): is this a first identity in a batch that requires approval?
    let batch: string;
    let required: boolean;
    if (identity.newDevice) {
      batch = identity.newDevice.batch;
      required = identity.batchRequiresApproval ?? !!Number((await rawSql<{ require_approval: number }>(store.db, store.dialect, 'select require_approval from batches where id = ?', [batch])).rows[0]?.require_approval);
    } else {
      const row = (await rawSql<{ state: string; batch_id: string; require_approval: number }>(store.db, store.dialect,
        'select d.state, d.batch_id, b.require_approval from devices d join batches b on b.id = d.batch_id where d.udid = ?', [identity.udid])).rows[0];
      if (!row || row.state !== 'registered') return undefined; // renewals and unknown devices (refused later) need none
      batch = row.batch_id;
      required = !!Number(row.require_approval);
    }
    if (!required) return undefined;
    return requireApproval(this.#authority.store, { batch, udid: identity.udid, keySha256: udidOfKey(request.csrSpki), authenticator: identity.authenticator, source: request.source, actor: identity.actor });
  }
}
