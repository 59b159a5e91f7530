"""nbgrader course configuration for the dstar_edu notebooks (nbgrader >= 0.9).

Layout (nbgrader's standard one, under the course root = the folder holding this file, or the folder that
``dstar-edu-course`` builds):

    source/dstar_edu/NN_*.ipynb          the instructor versions (copied from notebooks/ by dstar-edu-course)
    release/dstar_edu/NN_*.ipynb         the student versions (``generate``)
    submitted/<student>/dstar_edu/...    what students hand in (``autograde`` copies a submissions folder here)
    autograded/<student>/dstar_edu/...   executed and scored submissions; gradebook.db holds the scores

The notebooks mark solutions with ``### BEGIN SOLUTION`` / ``### END SOLUTION`` and autograder tests with
``### BEGIN HIDDEN TESTS`` / ``### END HIDDEN TESTS`` in cells whose nbgrader metadata gives the points.
"""
c = get_config()  # noqa: F821  (nbgrader injects get_config)

c.CourseDirectory.course_id = "dstar_edu"
c.CourseDirectory.db_assignments = [{"name": "dstar_edu"}]
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
# each notebook runs in < 60 s on 2 cores; a submission that loops forever is stopped after 300 s per cell
c.ExecutePreprocessor.timeout = 300
c.Execute.timeout = 300
c.Execute.interrupt_on_timeout = True
c.Execute.allow_errors = True          # a failing exercise loses its points; the rest is still graded
