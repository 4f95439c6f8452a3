// Claim: HTTP Basic credentials (claim id : secret) that let up to N devices of one batch enrol once
// each before the claim expires. The device is the holder of the CSR key: it must be registered in the
// claim's batch, unless the batch allows unregistered keys — then it is registered on first use (still
// under the batch quota, which the authority takes at issuance).

import { HallmarkError } from '../errors.js';
import { udidOfKey } from '../registry/registry.js';
import { rawSql } from '../store/raw-sql.js';
import { callOf } from '../store/procedures.js';
import { SPEND_CLAIM, checkClaim, parseBasicCredentials } from './claims.js';
import type { AuthenticatorContext, EnrolmentAuthenticator, EnrolmentIdentity, EnrolmentRequest } from './authenticator.js';

/** Failed claim presentations allowed per client address per minute (guessing defence). */
export const CLAIM_FAILURES_PER_MINUTE = 30;

export const claimAuthenticator: EnrolmentAuthenticator = {
  name: 'claim',
  presentIn: (request) => parseBasicCredentials(request.authorization) !== undefined,
  async authenticate(request: EnrolmentRequest, context: AuthenticatorContext): Promise<EnrolmentIdentity> {
    const presented = parseBasicCredentials(request.authorization)!;
    // Guessing is throttled per address before the store is touched; the check only counts failures.
    const failKey = `claim-fail:${request.source}`;
    if (context.limiter.take(failKey, CLAIM_FAILURES_PER_MINUTE, Date.now()) > 0) {
      throw Object.assign(new HallmarkError('RATE_LIMITED', 'too many failed claim presentations from this address; retry later'), { retryAfterSeconds: 60 });
    }
    const claim = await checkClaim(context.store, presented, `est:${request.source}`);
    // A successful presentation gives its failure token back.
    context.limiter.refund(failKey);
    context.limiter.check(`claim:${claim.id}`, Number(claim.per_minute), 'with this claim');
    const actor = `claim:${claim.id}`;
    // Hand-written SQL (src/store/raw-sql.ts) by the key's hash: request.csrSpki is canonical DER (the
    // registry hashes keys the same way), and Registry.deviceByPublicKey's joined, Kysely-built read costs
    // ~40 µs of event-loop time per enrolment for two columns.
    const device = (await rawSql<{ udid: string; batch_id: string }>(context.store.db, context.store.dialect, 'select udid, batch_id from devices where public_key_sha256 = ?', [udidOfKey(request.csrSpki)])).rows[0];
    if (device && device.batch_id !== claim.batch_id) {
      throw new HallmarkError('ENROLMENT_REFUSED', `the CSR key belongs to device ${device.udid} of batch ${device.batch_id}, not to this claim's batch ${claim.batch_id}`);
    }
    let newDevice: { batch: string; publicKeySpki: Buffer } | undefined;
    if (!device) {
      if (!Number(claim.batch_allow_unregistered)) {
        throw new HallmarkError('ENROLMENT_REFUSED', `the CSR key is not registered in batch ${claim.batch_id}, which does not accept unregistered keys`);
      }
      // Registered by the authority in the issuance's own transaction: a refused issuance leaves no registration behind.
      newDevice = { batch: claim.batch_id, publicKeySpki: request.csrSpki };
    }
    const udid = device ? device.udid : udidOfKey(request.csrSpki);
    return {
      authenticator: 'claim',
      udid,
      provenKeys: [request.csrSpki],
      actor,
      details: { authenticator: 'claim', claim: claim.id, registeredOnFirstUse: !!newDevice },
      steps: [callOf(SPEND_CLAIM, { claim: claim.id, udid, actor })],
      newDevice,
      batchRequiresApproval: !!Number(claim.batch_require_approval),
    };
  },
};
