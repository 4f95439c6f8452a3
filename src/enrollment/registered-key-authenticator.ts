// Registered key (the extracted-key model): the hardware key was read out at the factory or listed in
// the chipmaker's manifest and registered; the CSR's self-signature proves the requester holds it. When
// the CSR carries a challengePassword, it must be this TLS session's channel binding (RFC 7030 §3.5:
// base64 of tls-unique under TLS 1.2, of tls-exporter under TLS 1.3), so a CSR captured from one
// connection cannot be replayed on another.

import { timingSafeEqual } from 'node:crypto';
import { HallmarkError } from '../errors.js';
import { csrChallengePassword } from '../protocols/est/wire.js';
import type { AuthenticatorContext, EnrolmentAuthenticator, EnrolmentIdentity, EnrolmentRequest } from './authenticator.js';

export const registeredKeyAuthenticator: EnrolmentAuthenticator = {
  name: 'registered-key',
  presentIn: () => true,
  async authenticate(request: EnrolmentRequest, context: AuthenticatorContext): Promise<EnrolmentIdentity> {
    const device = await context.registry.deviceByPublicKey(request.csrSpki);
    if (!device) throw new HallmarkError('EST_CREDENTIALS_REQUIRED', 'the CSR key is not a registered device key, and no other credential was presented');
    const password = csrChallengePassword(request.csr);
    let bound = false;
    if (password !== undefined) {
      const expected = request.channelBinding ? Buffer.from(request.channelBinding.value.toString('base64')) : undefined;
      const got = Buffer.from(password.trim());
      if (!expected || expected.length !== got.length || !timingSafeEqual(expected, got)) {
        throw new HallmarkError('CHANNEL_BINDING_MISMATCH', `the CSR challengePassword is not this TLS session's ${request.channelBinding?.type ?? 'channel binding'} (make the CSR on the connection that sends it)`);
      }
      bound = true;
    }
    return {
      authenticator: 'registered-key',
      udid: device.udid,
      provenKeys: [request.csrSpki],
      actor: `device:${device.udid}`,
      details: { authenticator: 'registered-key', channelBinding: bound ? request.channelBinding!.type : 'none' },
    };
  },
};
