"""The package's public names resolve after the modules moved into packages (release/, experiments/)."""

import dpsign_fl


def test_every_name_the_package_exports_resolves():
    unresolved = []
    for name in dpsign_fl.__all__:
        try:
            getattr(dpsign_fl, name)
        except (AttributeError, ImportError) as error:
            unresolved.append(f"{name}: {error}")

    assert not unresolved


def test_the_public_imports_the_docs_and_the_drop_in_use_keep_working():
    from dpsign_fl import ReleaseSettings, SignMajorityVote, client_release, majority_vote
    from dpsign_fl.flower import dp_sign_train
    from dpsign_fl.privacy.ledger_store import read_ledger_file

    assert all(callable(thing) for thing in (ReleaseSettings, SignMajorityVote, client_release, majority_vote,
                                              dp_sign_train, read_ledger_file))
