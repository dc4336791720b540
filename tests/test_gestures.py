"""The button gestures with plain timestamps: no pins, no threads, no sleeping."""

from edge.gestures import CLEAR_ALL_HOLD, FUNCTION, SHORT_PRESS, Action, Gestures


def kinds(actions):
    return [(a.kind, a.button) for a in actions]


def test_hold_a_class_button_records_until_released():
    g = Gestures()
    assert kinds(g.press("A", True, 10.0)) == [("record", "A")]
    assert g.tick(20.0) == []
    assert kinds(g.press("A", False, 21.0)) == [("stop", "A")]


def test_a_tap_of_the_function_button_undoes():
    g = Gestures()
    assert g.press(FUNCTION, True, 5.0) == []
    assert g.press(FUNCTION, False, 5.0 + SHORT_PRESS - 0.01) == [Action("undo")]


def test_a_long_function_press_that_did_nothing_is_no_undo():
    g = Gestures()
    g.press(FUNCTION, True, 5.0)
    assert g.tick(5.0 + SHORT_PRESS + 0.5) == []
    assert g.press(FUNCTION, False, 5.0 + SHORT_PRESS + 0.6) == []


def test_function_held_and_a_class_button_clears_that_class_and_no_undo_follows():
    g = Gestures()
    g.press(FUNCTION, True, 1.0)
    assert kinds(g.press("B", True, 1.2)) == [("clear", "B")]
    assert kinds(g.press("B", False, 1.3)) == [("stop", "B")]     # nothing records: the loop ignores it
    assert g.clear_all_in(1.3) is None                            # this hold cleared B: no countdown
    assert g.press(FUNCTION, False, 1.4) == []                    # quick, but it was used: no undo
    assert g.tick(100.0) == []


def test_function_held_alone_clears_everything_once():
    g = Gestures()
    g.press(FUNCTION, True, 0.0)
    assert g.tick(CLEAR_ALL_HOLD - 0.01) == []
    assert g.held_for(CLEAR_ALL_HOLD - 0.01) == CLEAR_ALL_HOLD - 0.01
    assert abs(g.clear_all_in(CLEAR_ALL_HOLD - 0.01) - 0.01) < 1e-9    # the simulator's countdown
    assert g.tick(CLEAR_ALL_HOLD) == [Action("clear_all")]
    assert g.clear_all_in(CLEAR_ALL_HOLD + 1) is None and g.held_for(CLEAR_ALL_HOLD + 1) == 1 + CLEAR_ALL_HOLD
    assert g.tick(CLEAR_ALL_HOLD + 1) == []
    assert g.press(FUNCTION, False, CLEAR_ALL_HOLD + 2) == []
    assert g.held_for(CLEAR_ALL_HOLD + 2) is None


def test_clear_all_hold_is_a_setting():
    g = Gestures(clear_all_hold=0.5)
    g.press(FUNCTION, True, 0.0)
    assert g.tick(0.5) == [Action("clear_all")]


def test_buttons_held_at_start_are_ignored_until_released():
    g = Gestures(held_at_start=["A", FUNCTION])
    assert g.press("A", True, 1.0) == []          # a bounce while still held
    assert g.tick(60.0) == []                     # the function button held since start clears nothing
    assert g.clear_all_in(60.0) is None
    assert g.press("A", False, 2.0) == []         # its release ends the ignoring, does nothing else
    assert g.press(FUNCTION, False, 2.0) == []
    assert kinds(g.press("A", True, 3.0)) == [("record", "A")]
    g.press(FUNCTION, True, 4.0)
    assert g.press(FUNCTION, False, 4.1) == [Action("undo")]


def test_a_release_without_a_press_is_harmless():
    g = Gestures()
    assert g.press(FUNCTION, False, 1.0) == []
    assert kinds(g.press("C", False, 1.0)) == [("stop", "C")]
